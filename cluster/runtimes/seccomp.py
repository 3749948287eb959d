"""A seccomp filter that forbids new user namespaces, for the bubblewrap runtime.

bwrap's own `--disable-userns` cannot be combined with `--userns-block-fd`, which the
runtime needs to write a user namespace map of several ranges (the harness's root and the
agent's users). This filter does the same job: `unshare` and `clone` with CLONE_NEWUSER
fail with EPERM, and `clone3` (whose flags sit in memory a filter cannot read) with ENOSYS,
so that C libraries fall back to `clone`. Everything else is allowed. The program is
classic BPF, written out here (no libseccomp), for x86-64 and arm64; any other
architecture makes every call fail rather than run unfiltered.
"""

from __future__ import annotations

import errno
import os
import platform
import struct

CLONE_NEWUSER = 0x10000000
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
SYSCALLS = {"x86_64": {"unshare": 272, "clone": 56, "clone3": 435},
            "aarch64": {"unshare": 97, "clone": 220, "clone3": 435}}

# classic BPF: struct sock_filter {u16 code; u8 jt; u8 jf; u32 k}
LD_W_ABS, JEQ_K, JGE_K, JSET_K, RET_K = 0x20, 0x15, 0x35, 0x45, 0x06
X32_BIT = 0x40000000  # x86-64's x32 ABI: same audit arch, numbers from here
RET_ALLOW, RET_ERRNO, RET_KILL = 0x7FFF0000, 0x00050000, 0x80000000
NR, ARCH, ARG0_LOW = 0, 4, 16  # offsets in struct seccomp_data (little-endian low word of args[0])


def _op(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def no_new_userns_program(machine: str | None = None) -> bytes:
    """The filter as the bytes bwrap's `--seccomp FD` reads."""
    machine = machine or platform.machine()
    if machine not in AUDIT_ARCH:
        return _op(RET_K, RET_KILL)
    nr = SYSCALLS[machine]
    return b"".join([
        _op(LD_W_ABS, ARCH),
        _op(JEQ_K, AUDIT_ARCH[machine], jt=1),
        _op(RET_K, RET_KILL),  # a foreign ABI (e.g. x32, i386): nothing runs unfiltered
        _op(LD_W_ABS, NR),
        _op(JGE_K, X32_BIT, jf=1),
        _op(RET_K, RET_KILL),
        _op(JEQ_K, nr["clone3"], jf=1),
        _op(RET_K, RET_ERRNO | errno.ENOSYS),
        _op(JEQ_K, nr["unshare"], jt=1),
        _op(JEQ_K, nr["clone"], jf=3),
        _op(LD_W_ABS, ARG0_LOW),
        _op(JSET_K, CLONE_NEWUSER, jf=1),
        _op(RET_K, RET_ERRNO | errno.EPERM),
        _op(RET_K, RET_ALLOW),
    ])


def program_fd() -> int:
    """A readable descriptor holding the program, for `bwrap --seccomp FD` (the caller
    closes it once bwrap has started)."""
    read, write = os.pipe()
    os.write(write, no_new_userns_program())  # far below a pipe's buffer
    os.close(write)
    return read
