"""The commented starter policy written by ``policy init``."""

from __future__ import annotations

STARTER_POLICY = """\
# yaml-language-server: $schema=https://tool.invalid/schemas/policy/v1/policy.schema.json
# A starter network policy. Check it with:  tool-pipeline policy validate THIS_FILE
# Try a flow against it with:
#   tool-pipeline policy test THIS_FILE --flow "egress tcp 10.0.0.5:5432 exe=/usr/sbin/nginx"
apiVersion: tool/v1
kind: Policy
metadata:
  name: my-host
  description: What this host is allowed to talk to.
spec:
  # enforce: deny rules block in prevent mode.  audit: every deny in this file only flags (would-block).
  mode: enforce
  # What happens to connections no rule matches, per agent mode (allow | alert | deny),
  # either for all directions or per direction (egress, ingress, listen, raw).
  defaults:
    detect: alert
    prevent: {egress: deny, ingress: alert, listen: alert, raw: deny}
  rules:
    # Loopback traffic is always fine.
    - name: loopback
      action: allow
      direction: egress
      to: [127.0.0.0/8, "::1"]

    # Name resolution. Replace 'any' with your resolvers (see /etc/resolv.conf).
    - name: dns
      action: allow
      direction: egress
      to: [any]
      ports: [dns]

    # Example: let nginx reach its database, and nothing else reach it.
    # - name: nginx-to-db
    #   description: nginx talks to PostgreSQL on the database host
    #   action: allow
    #   direction: egress
    #   who: {exe: [/usr/sbin/nginx], user: [www-data]}
    #   to: [10.0.0.5]
    #   ports: [postgres]
    #   protocol: tcp

    # Example: accept SSH only from the admin network.
    # - name: ssh-from-admins
    #   action: allow
    #   direction: ingress
    #   from: [192.0.2.0/24]
    #   ports: [ssh]
    #   protocol: tcp

    # Never talk to the cloud metadata service (a common credential-theft path).
    - name: no-cloud-metadata
      action: deny
      direction: egress
      to: [169.254.169.254, "fd00:ec2::254"]
"""
