"""tools/guestkit/kvmprobe.py: the ioctl numbers of linux/kvm.h, and the vendor module seen in sysfs."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools" / "guestkit"))
import kvmprobe  # noqa: E402


def test_ioctl_numbers_are_those_of_linux_kvm_h():
    # the values the uapi header's _IO/_IOW/_IOR macros give (x86-64), i.e. the structures' sizes are right
    assert kvmprobe.KVM_CREATE_VM == 0xAE01
    assert kvmprobe.KVM_CREATE_VCPU == 0xAE41
    assert kvmprobe.KVM_RUN == 0xAE80
    assert kvmprobe.KVM_SET_USER_MEMORY_REGION == 0x4020AE46
    assert kvmprobe.KVM_SET_REGS == 0x4090AE82
    assert kvmprobe.KVM_GET_SREGS == 0x8138AE83
    assert kvmprobe.KVM_SET_SREGS == 0x4138AE84


def test_vendor_module(tmp_path):
    assert kvmprobe.vendor_module(tmp_path) == ""
    (tmp_path / "kvm_pvm").mkdir()
    assert kvmprobe.vendor_module(tmp_path) == "kvm_pvm"
    (tmp_path / "kvm_amd").mkdir()  # a hardware module is the one /dev/kvm uses
    assert kvmprobe.vendor_module(tmp_path) == "kvm_amd"


def test_the_verdict_is_a_reason_or_none():
    reason = kvmprobe.unusable_reason()
    assert reason is None or (isinstance(reason, str) and reason)
