"""What a policy asks of this host, checked when it is loaded and reloaded.

A file can be valid and still not fit the host it runs on: an egress rule's
``source`` address that no interface of the agent's network namespace has
(every flow it allows would fail), or a gateway's credential or CA file that
cannot be read. These are reported like the file's own problems, at the place
they were written, so that the agent refuses to start with them and a reload
keeps the policy in force.
"""

from __future__ import annotations

import errno
import os
import socket
import ssl

from egress_agent.policy.model import IPAddress, Place, Policy
from egress_agent.policy.yamlnodes import PolicyError, Problem

# Files the proxy reads a user name or password from are small.
MAX_CREDENTIAL_BYTES = 64 * 1024


def check_host(policy: Policy) -> None:
    """Raise :class:`PolicyError` listing what ``policy`` needs and this host lacks."""
    problems: list[Problem] = []
    for rule in policy.egress:
        if rule.source is not None:
            for address, where in zip(rule.source.addresses, rule.source.places, strict=False):
                why = address_problem(address)
                if why is not None:
                    problems.append(_at(where, why))
        via = rule.via
        if via is None:
            continue
        if via.auth is not None and via.auth.places is not None:
            for path, where in zip(
                (via.auth.username_file, via.auth.password_file), via.auth.places, strict=True
            ):
                why = credential_file_problem(path)
                if why is not None:
                    problems.append(_at(where, why))
        if via.tls is not None and via.tls.ca_file is not None and via.tls.ca_place is not None:
            why = ca_file_problem(via.tls.ca_file)
            if why is not None:
                problems.append(_at(via.tls.ca_place, why))
    if problems:
        raise PolicyError(sorted(problems, key=lambda p: (p.line, p.column)))


def address_problem(address: IPAddress) -> str | None:
    """Why upstream sockets cannot leave from ``address`` here, or None.

    Binding a socket to it, port 0, is the kernel's own answer: it fails with
    EADDRNOTAVAIL unless an interface of this network namespace has the
    address (and, for IPv6, duplicate address detection has finished)."""
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((str(address), 0))
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                add = "ip address add" if address.version == 4 else "ip -6 address add"
                return (
                    f"{address} is not an address of this host (its network namespace):"
                    f" add it to an interface ({add} {address}/PREFIX dev IFACE), or name"
                    " one the host has"
                    + (
                        "; a new IPv6 address is usable once duplicate address detection"
                        " has finished"
                        if address.version == 6
                        else ""
                    )
                )
            return f"cannot bind to {address}: {os.strerror(exc.errno or 0) or exc}"
    return None


def credential_file_problem(path: str) -> str | None:
    """Why the gateway credential file at ``path`` cannot be used, or None."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CREDENTIAL_BYTES + 1)
    except OSError as exc:
        return f"{path}: {_os_problem(exc)}"
    if len(data) > MAX_CREDENTIAL_BYTES:
        return f"{path}: larger than {MAX_CREDENTIAL_BYTES} bytes: expected a user name or password"
    if not data.strip():
        return f"{path}: the file is empty: write the user name or password into it"
    return None


def ca_file_problem(path: str) -> str | None:
    """Why the CA file at ``path`` cannot verify the gateway's certificate, or None."""
    try:
        ssl.create_default_context(cafile=path)
    except ssl.SSLError:
        return (
            f"{path}: no PEM certificate in it: give the CA certificate (PEM) that signed"
            " the gateway's"
        )
    except OSError as exc:
        return f"{path}: {_os_problem(exc)}"
    return None


def _os_problem(exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        return "no such file: create it, or correct the path"
    if exc.errno == errno.EACCES:
        return "permission denied: make it readable by the user running the agent"
    if exc.errno == errno.EISDIR:
        return "is a directory, expected a file"
    return f"cannot read: {exc.strerror or exc}"


def _at(where: Place, message: str) -> Problem:
    return Problem(
        file=where.file, line=where.line, column=where.column, path=where.path, message=message
    )
