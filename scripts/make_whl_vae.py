"""Make .whl_vae/ for a device call (issue #40): .whl/'s importlib_metadata wheel, and its diffusers wheel
without diffusers/pipelines/ and diffusers/modular_pipelines/ (their __init__.py and pipeline_utils.py
kept; RECORD rewritten): 2.1 MB instead of 6.4 MB, so that the tree, .whl_vae and .whl_conv or .whl_fp8
fit the device tool's 64 MiB (counted on disk; all three wheel folders and the tree were 64.1 MiB on
2026-12-07: a warm machine keeps what an earlier call installed, so calls carry them in turn). The decoders import only diffusers' models (AutoencoderKLWan); CPU check
with the stripped package first on PYTHONPATH: `python -m pytest tests/decode` passes (2026-12-07).

    python scripts/make_whl_vae.py      # from the repository root; .whl/ must hold the wheels (fetch_gpu_wheels.sh runs it)
"""

import base64
import glob
import hashlib
import os
import shutil
import tempfile
import zipfile

STRIP = ("diffusers/pipelines/", "diffusers/modular_pipelines/")
KEEP = (
    "diffusers/pipelines/__init__.py",
    "diffusers/pipelines/pipeline_utils.py",
    "diffusers/modular_pipelines/__init__.py",
)


def main() -> None:
    os.makedirs(".whl_vae", exist_ok=True)
    for wheel in glob.glob(".whl/importlib_metadata-*.whl"):
        shutil.copy(wheel, ".whl_vae/")
    (source,) = glob.glob(".whl/diffusers-*.whl")
    target = os.path.join(".whl_vae", os.path.basename(source))
    with zipfile.ZipFile(source) as src, tempfile.TemporaryDirectory() as tmp:
        part = os.path.join(tmp, "w.whl")
        record, names = [], [n for n in src.namelist() if not n.endswith("/")]
        (record_name,) = [n for n in names if n.endswith(".dist-info/RECORD")]
        with zipfile.ZipFile(part, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as out:
            for name in sorted(names):
                if name == record_name or (name.startswith(STRIP) and name not in KEEP):
                    continue
                data = src.read(name)
                digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
                record.append(f"{name},sha256={digest},{len(data)}")
                out.writestr(name, data)
            record.append(f"{record_name},,")
            out.writestr(record_name, "\n".join(record) + "\n")
        shutil.move(part, target)
    print(target, os.path.getsize(target))


if __name__ == "__main__":
    main()
