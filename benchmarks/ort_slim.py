"""onnxruntime-gpu for the GPU machine in two carried parts instead of five.

The GPU machine reaches no package index and takes at most 64 MiB of carried files per call;
the onnxruntime-gpu wheel is 255 MB, most of it the CUDA provider's kernels compiled for six
GPU generations (sm_75, 80, 86, 89, 90, 120). An H100/H200 loads only the sm_90 ones, so this
keeps those and zeroes the bytes of the others in place (every fatbin header and offset is
left as it was: the driver reads the headers to pick its entry and never touches the others),
drops the TensorRT provider, and packs the package as .tar.xz (68.6 MB for 1.31.1), split
into parts of at most 58 MB in ignored folders .ortslim1, .ortslim2, ...

    python3 benchmarks/ort_slim.py [WHEEL | --version 1.31.1] [--keep-arch 90]

Then carry .ortslim1 in one call (`mkdir -p /tmp/ortw && cp .ortslim1/* /tmp/ortw/`) and the
next part(s) in the next call on the same warm machine: benchmarks/gpu_final.sh assembles
and installs them into /tmp/site (it checks that every part is there).
"""
import argparse
import io
import os
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

FATBIN_MAGIC = 0xBA55ED50
ROOT = Path(__file__).resolve().parent.parent


def elf_section(data, name):
    """(offset, size) of the named section of a 64-bit little-endian ELF file."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    def header(i):
        return struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)
    strtab = header(shstrndx)
    for i in range(shnum):
        h = header(i)
        start = strtab[4] + h[0]
        if data[start:data.index(b"\0", start)].decode() == name:
            return h[4], h[5]
    return None


def fatbin_entries(data, offset, size):
    """Every entry of every fatbin in data[offset:offset+size]: (payload offset, payload size,
    kind, arch). Raises ValueError when the layout does not add up."""
    entries, pos, end = [], offset, offset + size
    while pos < end:
        magic, _version, hsize, fsize = struct.unpack_from("<IHHQ", data, pos)
        if magic != FATBIN_MAGIC:
            if data[pos:pos + 8] == bytes(8):  # alignment padding between fatbins
                pos += 8
                continue
            raise ValueError(f"no fatbin header at {pos:#x}")
        e, fend = pos + hsize, pos + hsize + fsize
        while e < fend:
            kind, _u, ehsize, psize = struct.unpack_from("<HHIQ", data, e)
            arch, = struct.unpack_from("<I", data, e + 28)
            entries.append((e + ehsize, psize, kind, arch))
            e += ehsize + psize
        if e != fend:
            raise ValueError(f"fatbin at {pos:#x}: entries end at {e:#x}, not {fend:#x}")
        pos = fend
    return entries


def keep_only_arch(data, arch):
    """Zero every fatbin entry not compiled for `arch` (in place); bytes zeroed, bytes kept."""
    section = elf_section(data, ".nv_fatbin")
    if section is None:
        return 0, 0
    entries = fatbin_entries(data, *section)
    if not any(a == arch for _, _, _, a in entries):
        raise ValueError(f"no entry for sm_{arch}: the library would not run there")
    zeroed = kept = 0
    for start, size, _kind, a in entries:
        if a == arch:
            kept += size
        else:
            data[start:start + size] = bytes(size)
            zeroed += size
    return zeroed, kept


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("wheel", nargs="?", help="an onnxruntime-gpu wheel (default: download --version)")
    p.add_argument("--version", default="1.31.1")
    p.add_argument("--keep-arch", type=int, default=90, help="the GPU generation kept (90: H100, H200)")
    p.add_argument("--part-mb", type=int, default=58)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel
        if wheel is None:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                            "--python-version", "3.12", "--implementation", "cp",
                            "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
                            "-d", tmp, f"onnxruntime-gpu=={args.version}"], check=True)
            wheel = next(Path(tmp).glob("onnxruntime_gpu-*.whl"))
        buf = io.BytesIO()
        with zipfile.ZipFile(wheel) as z, tarfile.open(fileobj=buf, mode="w") as tar:
            for info in z.infolist():
                if info.is_dir() or "providers_tensorrt" in info.filename:
                    continue
                data = bytearray(z.read(info))
                shared_library = info.filename.endswith(".so") or ".so." in info.filename
                if shared_library:
                    if data[:4] == b"\x7fELF":
                        zeroed, kept = keep_only_arch(data, args.keep_arch)
                        if zeroed:
                            print(f"{info.filename}: kept {kept / 1e6:.1f} MB of sm_{args.keep_arch} kernels, "
                                  f"zeroed {zeroed / 1e6:.1f} MB of others")
                t = tarfile.TarInfo(info.filename)
                t.size = len(data)
                t.mode = 0o755 if shared_library else 0o644
                tar.addfile(t, io.BytesIO(bytes(data)))
        packed = subprocess.run(["xz", "-9e", "-T2", "-c"], input=buf.getvalue(), capture_output=True,
                                check=True).stdout
    print(f"{Path(wheel).name}: {len(packed) / 1e6:.1f} MB packed")
    for old in ROOT.glob(".ortslim*"):
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    step = args.part_mb * 1000 * 1000
    parts = [packed[i:i + step] for i in range(0, len(packed), step)]
    exclude = ROOT / ".git" / "info" / "exclude"
    exclude.parent.mkdir(parents=True, exist_ok=True)
    lines = exclude.read_text().splitlines() if exclude.exists() else []
    for i, part in enumerate(parts, 1):
        d = ROOT / f".ortslim{i}"
        d.mkdir()
        (d / f"ort_slim.tar.xz.part{i:02d}").write_bytes(part)
        if f"/.ortslim{i}/" not in lines:
            lines.append(f"/.ortslim{i}/")
    (ROOT / ".ortslim1" / "NPARTS").write_text(f"{len(parts)}\n")
    exclude.write_text("\n".join(lines) + "\n")
    print(f"{len(parts)} parts in " + ", ".join(f".ortslim{i}" for i in range(1, len(parts) + 1)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
