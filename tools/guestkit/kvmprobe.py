"""Can this machine's ``/dev/kvm`` run the guest kit's kernel?  Answered in well under a second, without QEMU.

``unusable_reason()`` returns ``None`` when it can, else one sentence saying what was tried and what failed:

1. ``/dev/kvm`` opens and speaks API version 12 (``KVM_GET_API_VERSION``);
2. a vCPU really runs (in a child process, bounded in time): ``KVM_CREATE_VM``, one page of guest memory
   (``KVM_SET_USER_MEMORY_REGION``), ``KVM_CREATE_VCPU``, its ``kvm_run`` area mapped, real-mode code
   ``mov al, 0x42; out 0x10, al; hlt`` -- ``KVM_RUN`` must exit with ``KVM_EXIT_IO`` (port 0x10, byte 0x42),
   then with ``KVM_EXIT_HLT``;
3. the KVM vendor module is a hardware one (``kvm_intel``/``kvm_amd``), not ``kvm_pvm``: PVM (Pagetable-based
   Virtual Machine) runs guests without VT-x/AMD-V, in the CPU's user mode, and only a kernel built as a PVM
   guest runs past its emulated bootstrap -- a stock Debian kernel goes silent after its real-mode setup, with
   every QEMU machine, CPU, irqchip, firmware and boot protocol tried (step 2 passes there: real mode is
   emulated).

Constants and structures are those of ``linux/kvm.h`` (x86).

Command line:  ``python3 tools/guestkit/kvmprobe.py``  (prints the verdict; ``run`` is the child's step 2).
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import struct
import subprocess
import sys
from pathlib import Path

KVMIO = 0xAE
_IOC_WRITE, _IOC_READ = 1, 2


def _io(nr: int) -> int:
    return (KVMIO << 8) | nr


def _iow(nr: int, size: int) -> int:
    return (_IOC_WRITE << 30) | (size << 16) | (KVMIO << 8) | nr


def _ior(nr: int, size: int) -> int:
    return (_IOC_READ << 30) | (size << 16) | (KVMIO << 8) | nr


KVM_API_VERSION = 12
#: struct kvm_userspace_memory_region: slot, flags, guest_phys_addr, memory_size, userspace_addr
MEMORY_REGION = struct.Struct("=IIQQQ")
#: struct kvm_regs: rax rbx rcx rdx rsi rdi rsp rbp r8-r15 rip rflags
REGS = struct.Struct("=18Q")
REG_RIP, REG_RFLAGS = 16, 17
#: struct kvm_sregs: 8 kvm_segment (cs first: base u64, limit u32, selector u16, 10 bytes of flags), 2
#: kvm_dtable, cr0 cr2 cr3 cr4 cr8 efer apic_base, interrupt_bitmap[4]
SREGS_SIZE = 312
SEGMENT_BASE, SEGMENT_SELECTOR = struct.Struct("=Q"), struct.Struct("=H")
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, MEMORY_REGION.size)
KVM_RUN = _io(0x80)
KVM_SET_REGS = _iow(0x82, REGS.size)
KVM_GET_SREGS = _ior(0x83, SREGS_SIZE)
KVM_SET_SREGS = _iow(0x84, SREGS_SIZE)
#: struct kvm_run: exit_reason (u32) at 8; the exit's union at 32 -- for KVM_EXIT_IO: direction u8, size u8,
#: port u16, count u32, data_offset u64 (from the start of kvm_run)
RUN_EXIT_REASON = struct.Struct("=I")
RUN_EXIT_REASON_OFFSET, RUN_EXIT_OFFSET = 8, 32
RUN_IO = struct.Struct("=BBHIQ")
KVM_EXIT_IO, KVM_EXIT_HLT = 2, 5
KVM_EXIT_IO_OUT = 1
#: guest-physical address of the probe's page; real mode, CS base 0: RIP is that address
CODE_GPA = 0x1000
PAGE = 4096
PROBE_PORT, PROBE_BYTE = 0x10, 0x42
#: mov al, PROBE_BYTE; out PROBE_PORT, al; hlt
CODE = bytes([0xB0, PROBE_BYTE, 0xE6, PROBE_PORT, 0xF4])
#: a vCPU that has not halted by then will not
RUN_TIMEOUT = 10.0
#: the vendor modules of hardware-assisted KVM, and the one of PVM
HARDWARE_MODULES = ("kvm_intel", "kvm_amd")
PVM_MODULE = "kvm_pvm"
SYS_MODULE = Path("/sys/module")


def run_vcpu(kvm: int) -> str:
    """Step 2 on an open ``/dev/kvm``: '' when the vCPU ran the code to its ``hlt``, else what went wrong."""
    vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
    mem = mmap.mmap(-1, PAGE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, mmap.PROT_READ | mmap.PROT_WRITE)
    mem[: len(CODE)] = CODE
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    fcntl.ioctl(vm, KVM_SET_USER_MEMORY_REGION, MEMORY_REGION.pack(0, 0, CODE_GPA, PAGE, addr))
    vcpu = fcntl.ioctl(vm, KVM_CREATE_VCPU, 0)
    run = mmap.mmap(vcpu, fcntl.ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0), mmap.MAP_SHARED)
    sregs = bytearray(SREGS_SIZE)
    fcntl.ioctl(vcpu, KVM_GET_SREGS, sregs)
    SEGMENT_BASE.pack_into(sregs, 0, 0)
    SEGMENT_SELECTOR.pack_into(sregs, 12, 0)
    fcntl.ioctl(vcpu, KVM_SET_SREGS, bytes(sregs))
    regs = [0] * 18
    regs[REG_RIP], regs[REG_RFLAGS] = CODE_GPA, 0x2
    fcntl.ioctl(vcpu, KVM_SET_REGS, REGS.pack(*regs))
    fcntl.ioctl(vcpu, KVM_RUN, 0)
    (reason,) = RUN_EXIT_REASON.unpack_from(run, RUN_EXIT_REASON_OFFSET)
    if reason != KVM_EXIT_IO:
        return f"the first KVM_RUN exited with reason {reason}, not KVM_EXIT_IO ({KVM_EXIT_IO})"
    direction, size, port, count, offset = RUN_IO.unpack_from(run, RUN_EXIT_OFFSET)
    if (direction, size, port, count) != (KVM_EXIT_IO_OUT, 1, PROBE_PORT, 1) or run[offset] != PROBE_BYTE:
        return f"KVM_EXIT_IO was not the probe's out: direction {direction} size {size} port {port:#x}"
    fcntl.ioctl(vcpu, KVM_RUN, 0)
    (reason,) = RUN_EXIT_REASON.unpack_from(run, RUN_EXIT_REASON_OFFSET)
    if reason != KVM_EXIT_HLT:
        return f"the second KVM_RUN exited with reason {reason}, not KVM_EXIT_HLT ({KVM_EXIT_HLT})"
    return ""


def vendor_module(sys_module: Path = SYS_MODULE) -> str:
    """The loaded KVM vendor module: kvm_intel, kvm_amd, kvm_pvm, or '' when none is seen in sysfs."""
    for name in (*HARDWARE_MODULES, PVM_MODULE):
        if (sys_module / name).is_dir():
            return name
    return ""


def unusable_reason(timeout: float = RUN_TIMEOUT) -> str | None:
    """None when ``/dev/kvm`` can run the kit's kernel, else why not (what was tried, what failed)."""
    try:
        kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"/dev/kvm cannot be opened ({e.strerror})"
    try:
        version = fcntl.ioctl(kvm, KVM_GET_API_VERSION, 0)
    except OSError as e:
        return f"/dev/kvm refuses KVM_GET_API_VERSION ({e.strerror})"
    finally:
        os.close(kvm)
    if version != KVM_API_VERSION:
        return f"/dev/kvm speaks KVM API {version}, not {KVM_API_VERSION}"
    try:
        child = subprocess.run(
            [sys.executable, __file__, "run"], capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return f"a real-mode vCPU on /dev/kvm did not reach its hlt in {timeout:.0f} s"
    if child.returncode != 0:
        why = (child.stdout + child.stderr).strip().splitlines() or [f"exit status {child.returncode}"]
        return f"a real-mode vCPU on /dev/kvm did not run: {why[-1]}"
    if vendor_module() == PVM_MODULE:
        return (
            "/dev/kvm is PVM (kvm_pvm, no VT-x/AMD-V): a real-mode vCPU runs (KVM_RUN: out, hlt), but PVM runs "
            "only kernels built as PVM guests; the kit's Debian kernel runs its real-mode setup ('Probing EDD'), "
            "then prints nothing, neither decompressor nor kernel line (tried: -machine q35/pc/microvm, "
            "-cpu host,-arch-capabilities/kvm64 (host and max abort: MSR 0x10a refused), kernel_irqchip=split "
            "(off aborts), noapic nolapic, no-kvmclock clocksource=tsc, earlyprintk, SeaBIOS/qboot, PVH boot of "
            "the uncompressed vmlinux)"
        )
    return None


def main(argv: list[str]) -> int:
    if argv[:1] == ["run"]:
        kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        why = run_vcpu(kvm)
        print(why or "the vCPU ran to its hlt")
        return 1 if why else 0
    reason = unusable_reason()
    print(reason or "/dev/kvm runs the kit's kernel")
    return 1 if reason else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
