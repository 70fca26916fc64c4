"""What arrives at a lab host's interface, packet by packet: the target's view.

Tests of packets that must never leave the node (spoofed sources, TCP behind
AH, non-TCP of a workload) are judged where they would arrive: an
``AF_PACKET`` socket on the external host's ``eth0`` writes one JSON line per
IPv4/IPv6 packet it receives (source, destination, the protocol chain, ports
and TCP flags). Nothing is filtered or answered; only incoming packets are
logged (``PACKET_OUTGOING`` ones are skipped).

    python tests/lab/sniff.py --interface eth0 --log packets.jsonl
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from egress_agent.lab.servers import wait_ready

if TYPE_CHECKING:
    from egress_agent.lab.netns import Lab

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
PACKET_OUTGOING = 4  # include/uapi/linux/if_packet.h
# IPv6 extension headers with the generic (next header, length in 8-octet
# units beyond the first) layout; AH counts its length in 4-octet units
# (RFC 4302 section 2.2), the fragment header is 8 octets (RFC 8200 4.5).
_EXT_GENERIC = {0, 43, 60}
_AH = 51
_FRAGMENT = 44
_TCP = 6
_UDP = 17


def describe(frame: bytes) -> dict[str, Any] | None:
    """One Ethernet frame as a record, or None when it is not IP."""
    if len(frame) < 14:
        return None
    (ethertype,) = struct.unpack("!H", frame[12:14])
    ip = frame[14:]
    record: dict[str, Any] = {}
    if ethertype == ETH_P_IP and len(ip) >= 20:
        ihl = (ip[0] & 0x0F) * 4
        record["src"] = str(ipaddress.IPv4Address(ip[12:16]))
        record["dst"] = str(ipaddress.IPv4Address(ip[16:20]))
        chain = [ip[9]]
        offset = ihl
        if ip[9] == _AH and len(ip) >= ihl + 2:
            chain.append(ip[ihl])
            offset = ihl + (ip[ihl + 1] + 2) * 4
    elif ethertype == ETH_P_IPV6 and len(ip) >= 40:
        record["src"] = str(ipaddress.IPv6Address(ip[8:24]))
        record["dst"] = str(ipaddress.IPv6Address(ip[24:40]))
        chain = [ip[6]]
        offset = 40
        for _ in range(8):
            nh = chain[-1]
            if len(ip) < offset + 2 or nh not in (*_EXT_GENERIC, _AH, _FRAGMENT):
                break
            chain.append(ip[offset])
            if nh == _AH:
                offset += (ip[offset + 1] + 2) * 4
            elif nh == _FRAGMENT:
                offset += 8
            else:
                offset += (ip[offset + 1] + 1) * 8
    else:
        return None
    record["protocols"] = chain
    last = chain[-1]
    if last in (_TCP, _UDP) and len(ip) >= offset + 4:
        record["sport"], record["dport"] = struct.unpack("!HH", ip[offset : offset + 4])
        if last == _TCP and len(ip) >= offset + 14:
            record["tcp_flags"] = ip[offset + 13]
    return record


def sniff(interface: str, log: Path) -> int:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    try:
        sock.bind((interface, 0))
    except OSError as exc:
        print(f"FAILED: {exc}", flush=True)
        return 1
    sock.settimeout(0.2)
    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    print("READY", flush=True)
    with open(log, "a", buffering=1) as out:
        while not stop:
            try:
                frame, address = sock.recvfrom(65535)
            except TimeoutError:
                continue
            if address[2] == PACKET_OUTGOING:
                continue
            record = describe(frame)
            if record is not None:
                record["time"] = time.time()
                out.write(json.dumps(record) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sniff.py", description=__doc__.split("\n")[0])
    p.add_argument("--interface", default="eth0")
    p.add_argument("--log", required=True, type=Path)
    args = p.parse_args(argv)
    return sniff(args.interface, args.log)


def start_sniffer(
    lab: Lab, host: str, *, log: Path, interface: str = "eth0", timeout: float = 10.0
) -> subprocess.Popen[bytes]:
    """Log what arrives at ``host``'s ``interface``; the lab stops it at teardown."""
    argv = [sys.executable, __file__, "--interface", interface]
    argv += ["--log", str(log)]
    proc: subprocess.Popen[bytes] = lab.popen(host, argv, stdout=subprocess.PIPE)
    wait_ready(proc, f"packet log in {host}", timeout)
    return proc


def read_packets(log: Path) -> list[dict[str, Any]]:
    """The records logged so far (a line still being written is left out)."""
    try:
        text = log.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.split("\n")[:-1] if line]


if __name__ == "__main__":
    sys.exit(main())
