#!/usr/bin/env python3
"""Runs a real Home Assistant Core against an MQTT broker and reports what
it shows, for tests/it/homeassistant_real.rs.

Usage: ha_watch.py <config_dir> <mqtt_port>

Runs Home Assistant's own bootstrap with its MQTT integration; the
integrations it loads by default beyond that (frontend, onboarding, cloud,
...) are left out, as they need packages the test does not.

Home Assistant's MQTT integration is configured through a config entry
(it has had no YAML setup since 2022.12), so one is written the way Home
Assistant stores it, with discovery on. Every 200 ms one JSON line goes to
stdout: {"entities": {entity_id: {"unique_id", "state", "attributes"}}}
for every entity the MQTT integration registered. Ends when stdin closes.
"""

import asyncio
import json
import os
import sys


def write_config(config_dir: str, port: int) -> None:
    os.makedirs(os.path.join(config_dir, ".storage"), exist_ok=True)
    with open(os.path.join(config_dir, "configuration.yaml"), "w") as f:
        f.write(
            "homeassistant:\n  name: presenced test\n  time_zone: UTC\n"
            "  unit_system: metric\n  latitude: 0\n  longitude: 0\n  elevation: 0\n"
        )
    entry = {
        "entry_id": "presencedtestmqtt",
        "version": 1,
        "minor_version": 1,
        "domain": "mqtt",
        "title": "127.0.0.1",
        "data": {"broker": "127.0.0.1", "port": port, "discovery": True},
        "options": {},
        "pref_disable_new_entities": False,
        "pref_disable_polling": False,
        "source": "user",
        "unique_id": None,
        "disabled_by": None,
    }
    with open(os.path.join(config_dir, ".storage", "core.config_entries"), "w") as f:
        json.dump(
            {
                "version": 1,
                "minor_version": 1,
                "key": "core.config_entries",
                "data": {"entries": [entry]},
            },
            f,
        )


async def main(config_dir: str, port: int) -> None:
    from homeassistant import bootstrap
    from homeassistant.helpers import entity_registry as er
    from homeassistant.runner import RuntimeConfig

    # Only what MQTT discovery needs: no frontend (and so no recovery mode
    # for lack of it), no onboarding, no cloud. The MQTT integration, its
    # discovery and the entity and device registries are Home Assistant's
    # own, unchanged.
    bootstrap.CRITICAL_INTEGRATIONS = set()
    bootstrap.DEFAULT_INTEGRATIONS = {"logger"}

    write_config(config_dir, port)
    runtime = RuntimeConfig(config_dir=config_dir, skip_pip=True)
    hass = await bootstrap.async_setup_hass(runtime)
    if hass is None:
        print(json.dumps({"error": "home assistant did not set up"}), flush=True)
        sys.exit(1)
    run = asyncio.create_task(hass.async_run(attach_signals=False))

    loop = asyncio.get_running_loop()
    stdin_closed = loop.run_in_executor(None, sys.stdin.read)

    while not stdin_closed.done() and not run.done():
        registry = er.async_get(hass)
        entities = {}
        for entry in list(registry.entities.values()):
            if entry.platform != "mqtt":
                continue
            state = hass.states.get(entry.entity_id)
            entities[entry.entity_id] = {
                "unique_id": entry.unique_id,
                "state": state.state if state else None,
                "attributes": dict(state.attributes) if state else {},
            }
        print(json.dumps({"entities": entities}, default=str), flush=True)
        await asyncio.sleep(0.2)
    await hass.async_stop()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
