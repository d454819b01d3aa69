"""``sidecar ip explain``: how one request's address is resolved and which rule decides it.

Operators reach for this when someone is unexpectedly blocked, so it shows both lists even
when the denylist already decided (the denylist wins first, which is the usual surprise).
"""

from __future__ import annotations

from sidecar.config import Config
from sidecar.decision import Decision
from sidecar.live import NetworkPolicy
from sidecar.net import Unresolved, parse_ip, resolve_client_ip
from sidecar.net.client_ip import ClientIpHeader
from sidecar.settings import networks

_HEADER_SPELLING = {
    ClientIpHeader.X_FORWARDED_FOR: "X-Forwarded-For",
    ClientIpHeader.FORWARDED: "Forwarded",
    ClientIpHeader.X_REAL_IP: "X-Real-IP",
}


def _synthesized_header(header: ClientIpHeader, addr: str) -> str:
    if header is ClientIpHeader.FORWARDED:
        ip = parse_ip(addr)
        return f'for="[{ip}]"' if ip is not None and ip.version == 6 else f"for={addr}"
    return addr


def explain_ip(
    config: Config,
    addr: str,
    *,
    via: str | None,
    header_lines: list[str],
    lists: tuple[list[str], list[str], str] | None = None,
) -> tuple[str, bool]:
    """A human-readable report and whether such a request would pass the IP stages.

    Raises ValueError for input that is not an address or header line (a usage error).
    """
    if lists is None:
        policy = NetworkPolicy.build(config)
        source = "the YAML"
    else:
        allow_lines, deny_lines, source = lists
        policy = NetworkPolicy.build(
            config, allowlist=networks(tuple(allow_lines)), denylist=networks(tuple(deny_lines))
        )
    header = policy.client_ip_header
    name = _HEADER_SPELLING[header]
    lines: list[str] = []
    values: list[str] = []
    for raw in header_lines:
        field, sep, value = raw.partition(":")
        if not sep:
            raise ValueError(f"--header {raw!r}: write it as 'Name: value'")
        if field.strip().lower() != header.value:
            lines.append(
                f"note: header {field.strip()} ignored: network.client_ip_header is {name}"
            )
            continue
        values.append(value.strip())
    peer = via if via is not None else addr
    if via is not None and not values:
        values = [_synthesized_header(header, addr)]
    peer_ip = parse_ip(peer)
    if peer_ip is None:
        raise ValueError(f"{peer!r} is not an IP address")
    trusted_rule = policy.trusted_proxies.matching_rule(peer_ip)
    if trusted_rule is None:
        lines.append(f"TCP peer {peer_ip}: not a trusted proxy, so it is the client address")
        if values:
            lines.append(f"  ({name} from an untrusted peer is ignored and replaced)")
    else:
        lines.append(f"TCP peer {peer_ip}: trusted proxy (network.trusted_proxies {trusted_rule})")
        for value in values:
            lines.append(f"  {name}: {value}")
    resolved = resolve_client_ip(peer, values, policy.trusted_proxies, header)
    if isinstance(resolved, Unresolved):
        lines.append(f"client address: cannot be determined: {resolved.reason}")
        lines.append(
            f"decision: {Decision.DENIED_IP.value} (refused with {policy.block_status}: "
            "an unreadable forwarded entry is never skipped)"
        )
        return "\n".join(lines), False
    lines.append(f"client address: {resolved}")
    lines.append(f"IP lists from {source}")
    if via is not None and values and parse_ip(addr) not in (None, resolved):
        lines.append(f"  (note: that is not {addr}, the address you asked about)")
    gate = policy.gate
    deny = gate.denylist.matching_rule(resolved) if resolved in gate.denylist else None
    allow = gate.allowlist.matching_rule(resolved) if resolved in gate.allowlist else None
    lines.append(
        f"denylist ({len(gate.denylist)} rules, checked first): "
        + (f"matches {deny}" if deny else "no match")
    )
    if len(gate.allowlist) == 0:
        lines.append("allowlist: empty, so every address not denied is allowed")
    else:
        lines.append(
            f"allowlist ({len(gate.allowlist)} rules): "
            + (f"matches {allow}" if allow else "no match")
        )
    verdict = gate.decide(resolved)
    if verdict.decision is Decision.ALLOWED:
        lines.append("decision: allowed (identity and MFA checks follow)")
    else:
        lines.append(
            f"decision: {verdict.decision.value} (refused with {policy.block_status}"
            + (": the denylist wins even though the allowlist matches" if deny and allow else "")
            + ")"
        )
    return "\n".join(lines), verdict.decision is Decision.ALLOWED
