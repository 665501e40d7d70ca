# The VM tests, by file name in this directory.
[
  "basic"
  "containers"
  "cluster"
  "archive"
  "acl"
  "failover"
  "failover-hosts"
]
