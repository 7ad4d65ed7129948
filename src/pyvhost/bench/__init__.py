"""``pyvhost bench``: devices measured side by side in one run, against the reference peers (net: the metadata
paths and DPDK's vhost PMD; blk: qemu-storage-daemon; scsi: pyvhost's blk on the same image; fs: QEMU's
virtiofsd, from inside a guest).  ``net``, ``blk``, ``scsi`` and ``fs`` hold the measurements, ``peers`` the
processes they run."""

from __future__ import annotations

import argparse

from . import blk, fs, guests, net, scsi, vsock


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        choices=["net", "blk", "scsi", "fs", "vsock"],
        default="net",
        help="net (default); blk: pyvhost's virtio-blk against qemu-storage-daemon (bench/blk.py); "
        "scsi: pyvhost's virtio-scsi (direct and copy) against pyvhost's virtio-blk on the same image (bench/scsi.py); "
        "fs: pyvhost's virtio-fs against virtiofsd, measured in a QEMU guest (bench/fs.py); "
        "vsock: MB/s over one connection and over 16, both ways, from a QEMU guest (bench/vsock.py)",
    )
    p.add_argument(
        "--guests",
        metavar="N,N,...",
        help="measure instead the resident memory of one back-end process serving N guests (--socket-count N, "
        "net sink), e.g. 1,8,64 (bench/guests.py)",
    )
    p.add_argument("--image-mb", type=int, default=256, help="blk, scsi: size of the benchmark image")
    p.add_argument("--fs-mb", type=int, default=128, help="fs: size of the file the guest writes and reads")
    p.add_argument(
        "--peer",
        choices=["pyvhost", "dpdk"],
        default="pyvhost",
        help="pyvhost: pyvhost's own front-end (default); dpdk: add DPDK's vhost PMD and virtio-user",
    )
    p.add_argument("--metadata", choices=["copy", "direct", "both"], default="both")
    p.add_argument("--direction", choices=["tx", "rx", "both"], default="both")
    p.add_argument(
        "--workload",
        help="net: comma list of tx (sink, no payload access), tx-read (sink reading every payload byte), rx, "
        "loop (testpmd flowgen through a reflector; needs DPDK); default: --direction",
    )
    p.add_argument(
        "--ring",
        choices=["split", "packed", "both"],
        default="split",
        help="virtqueue layout the front-ends negotiate (packed: VIRTIO_F_RING_PACKED)",
    )
    p.add_argument(
        "--dirty-log",
        choices=["off", "on", "both"],
        default="off",
        help="net: the pyvhost front-end shares a dirty log and switches VHOST_F_LOG_ALL on (a migrating guest); "
        "both: each configuration with logging off and on, run in pairs",
    )
    p.add_argument(
        "--iommu",
        action="store_true",
        help="net: the vIOMMU rows -- direct vs copy with the IOTLB on at 1, 64 and 2,048 entries (and without), "
        "and with --peer dpdk DPDK's net_vhost iommu-support=1, all driven by pyvhost's front-end",
    )
    p.add_argument(
        "--regions",
        metavar="N,N,...",
        help="net: the memory-slot rows -- direct vs copy with pyvhost's front-end's RAM shared as N regions "
        "(ADD_MEM_REG, rings and buffers spread over them) for each N, e.g. 1,8,64,509",
    )
    p.add_argument("--seconds", type=float, default=3.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    p.add_argument("--runs", type=int, default=3, help="runs per configuration (alternating)")
    p.add_argument("--queue-size", type=int, default=256)
    p.add_argument(
        "--queue-pairs",
        default="1",
        help="net: pyvhost front-end and back-end with this many queue pairs driven at once, one count or a comma "
        "list (1,2): a front-end thread and a back-end worker per pair, each side on its one CPU",
    )
    p.add_argument("--pkt-size", default="64", help="net: frame bytes, one or a comma list (64,512,1518)")
    p.add_argument("--batch", type=int, default=64, help="pyvhost front-end batch")
    p.add_argument(
        "--burst",
        type=int,
        default=32,
        help="net: the back-ends' burst, the same on both sides: pyvhost serve --batch N and DPDK testpmd --burst=N "
        "(DPDK's vhost PMD dequeues at most 32 per call and loops above that); testpmd's front-end uses it too",
    )
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--plot", help="write a PNG bar chart here")
    p.add_argument("--workdir", help="keep sockets and logs here (default: a temporary directory)")


def main(a: argparse.Namespace) -> int:
    if a.guests:
        return guests.main(a)
    if a.device == "fs":
        return fs.main(a)
    if a.device == "vsock":
        return vsock.main(a)
    if a.device == "scsi":
        return scsi.main(a)
    return blk.main(a) if a.device == "blk" else net.main(a)
