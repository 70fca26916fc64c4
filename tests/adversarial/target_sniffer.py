"""What reached the target: every IP packet that arrives on a host's eth0.

Run in an "internet" host's namespace: ``target_sniffer.py LOG [IFNAME]``.
An AF_PACKET socket sees each frame as it arrives, before reassembly and
before the host's own stack drops anything (a SYN with a TCP-MD5 option the
host has no key for, AH with no security association), so the log says what
the network delivered, not what the host chose to accept. One JSON line per
incoming IPv4/IPv6 packet, flushed at once::

    {"t": monotonic, "src": "198.19.1.2", "dst": "198.18.1.2", "proto": 6,
     "chain": [6], "sport": 40123, "dport": 443, "flags": 2, "opts": [2, 19, 0],
     "frag": false, "len": 60}

``chain`` is the IPv6 header chain (next-header values walked); ``proto``
the upper layer it ends in (or the first header that cannot be walked);
``frag`` whether the packet is a fragment (ports only from first fragments);
``opts`` the kinds of a TCP header's options (19 is TCP-MD5).
Prints ``READY`` once the socket is bound; stops on SIGTERM.
"""

from __future__ import annotations

import json
import signal
import socket
import struct
import sys
import time
from typing import Any

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
IPV6_EXT = {0, 43, 60}  # hop-by-hop, routing, destination options
IPV6_FRAGMENT = 44
AH = 51


def tcp_option_kinds(opts: bytes) -> list[int]:
    kinds, i = [], 0
    while i < len(opts):
        kind = opts[i]
        kinds.append(kind)
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= len(opts) or opts[i + 1] < 2:
            break
        i += opts[i + 1]
    return kinds


def parse(frame: bytes) -> dict[str, Any] | None:
    ethertype = struct.unpack("!H", frame[12:14])[0]
    off = 14
    while ethertype in (0x8100, 0x88A8) and len(frame) >= off + 4:
        ethertype = struct.unpack("!H", frame[off + 2 : off + 4])[0]
        off += 4
    pkt = frame[off:]
    rec: dict[str, Any] = {"t": time.monotonic(), "len": len(pkt), "frag": False}
    if ethertype == 0x0800 and len(pkt) >= 20:
        ihl = (pkt[0] & 0x0F) * 4
        rec["src"] = socket.inet_ntop(socket.AF_INET, pkt[12:16])
        rec["dst"] = socket.inet_ntop(socket.AF_INET, pkt[16:20])
        proto = pkt[9]
        frag = struct.unpack("!H", pkt[6:8])[0]
        rec["frag"] = bool(frag & 0x3FFF)
        first = (frag & 0x1FFF) == 0
        rec["chain"] = [proto]
        l4 = ihl
        if proto == AH and first and len(pkt) >= l4 + 2:
            proto = pkt[l4]
            l4 += (pkt[l4 + 1] + 2) * 4
            rec["chain"].append(proto)
    elif ethertype == 0x86DD and len(pkt) >= 40:
        rec["src"] = socket.inet_ntop(socket.AF_INET6, pkt[8:24])
        rec["dst"] = socket.inet_ntop(socket.AF_INET6, pkt[24:40])
        proto = pkt[6]
        l4 = 40
        first = True
        rec["chain"] = [proto]
        for _ in range(16):
            if len(pkt) < l4 + 8:
                break
            if proto in IPV6_EXT:
                nxt, size = pkt[l4], (pkt[l4 + 1] + 1) * 8
            elif proto == AH:
                nxt, size = pkt[l4], (pkt[l4 + 1] + 2) * 4
            elif proto == IPV6_FRAGMENT:
                rec["frag"] = True
                first = (struct.unpack("!H", pkt[l4 + 2 : l4 + 4])[0] & 0xFFF8) == 0
                nxt, size = pkt[l4], 8
            else:
                break
            proto, l4 = nxt, l4 + size
            rec["chain"].append(proto)
    else:
        return None
    rec["proto"] = proto
    if first and proto in (6, 17) and len(pkt) >= l4 + 4:
        rec["sport"], rec["dport"] = struct.unpack("!HH", pkt[l4 : l4 + 4])
        if proto == 6 and len(pkt) >= l4 + 14:
            rec["flags"] = pkt[l4 + 13]
            rec["opts"] = tcp_option_kinds(pkt[l4 + 20 : l4 + (pkt[l4 + 12] >> 4) * 4])
    return rec


def main() -> None:
    log_path = sys.argv[1]
    ifname = sys.argv[2] if len(sys.argv) > 2 else "eth0"
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind((ifname, 0))
    running = True

    def stop(signum: int, frame: object) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    sock.settimeout(0.2)
    print("READY", flush=True)
    with open(log_path, "a") as log:
        while running:
            try:
                frame, addr = sock.recvfrom(65535)
            except TimeoutError:
                continue
            except InterruptedError:
                continue
            if addr[2] == PACKET_OUTGOING:
                continue
            rec = parse(frame)
            if rec is not None:
                log.write(json.dumps(rec) + "\n")
                log.flush()


if __name__ == "__main__":
    main()
