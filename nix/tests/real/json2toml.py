"""JSON on stdin to TOML on stdout: the stand-in for nixpkgs' TOML format
writer in the render tests. Tables after plain keys, arrays of tables as
[[...]] (their own tables inline), no null (TOML has none: such keys are dropped, as remarshal does)."""

import json
import sys


def key(k):
    if k and all(c.isalnum() or c in "-_" for c in k):
        return k
    return json.dumps(k)


def value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return json.dumps(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{key(k)} = {value(x)}" for k, x in v.items() if x is not None) + " }"
    raise TypeError(f"no TOML for {v!r}")


def is_table_array(v):
    return isinstance(v, list) and v and all(isinstance(x, dict) for x in v)


def table(path, d, out):
    plain = {k: v for k, v in d.items() if v is not None and not isinstance(v, dict) and not is_table_array(v)}
    if path and (plain or not d):
        out.append(f"[{'.'.join(map(key, path))}]")
    for k, v in plain.items():
        out.append(f"{key(k)} = {value(v)}")
    for k, v in d.items():
        if isinstance(v, dict):
            table(path + [k], v, out)
        elif is_table_array(v):
            for item in v:
                # An item's own tables are written inline.
                out.append(f"[[{'.'.join(map(key, path + [k]))}]]")
                out.extend(f"{key(ik)} = {value(iv)}" for ik, iv in item.items() if iv is not None)


def main():
    out = []
    table([], json.load(sys.stdin), out)
    sys.stdout.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
