#!/usr/bin/env python3
"""Fetch the pinned llama-cpp-python sdist, verify it, unpack its vendored
llama.cpp into third_party/llama.cpp and apply patches/ in order.

Idempotent: a stamp records the sdist hash and the patches' hashes; when they
match, nothing is done. Standard library only, so it runs before any install.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PINS = json.loads((ROOT / "scripts" / "pins.json").read_text())["llama_cpp_python"]
STAMP_NAME = ".triattention-stamp"


class FetchError(Exception):
    """A step failed; the message says what and what to do."""


def cache_dir() -> Path:
    return Path(os.environ.get("TRIATTENTION_CACHE", Path.home() / ".cache" / "triattention-gguf"))


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def download_sdist(dest_dir: Path) -> Path:
    """Download the pinned sdist with pip (registry only) unless cached."""
    path = dest_dir / PINS["sdist"]
    if path.exists():
        return path
    dest_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "-d", str(dest_dir), f"llama-cpp-python=={PINS['version']}"]
    # stdout is reserved for --print-sdist's answer.
    print("fetch:", " ".join(cmd), file=sys.stderr, flush=True)
    if subprocess.run(cmd, stdout=sys.stderr).returncode != 0 or not path.exists():
        raise FetchError(f"pip could not download llama-cpp-python=={PINS['version']} "
                         "(is the package registry reachable?)")
    return path


def verify_sdist(path: Path) -> str:
    actual = sha256_file(path)
    if actual != PINS["sha256"]:
        raise FetchError(
            f"sha256 mismatch for {path}:\n  expected {PINS['sha256']}\n  got      {actual}\n"
            "The file is corrupt or has been tampered with; nothing was unpacked. "
            "Delete it and run this step again to download a fresh copy.")
    return actual


def patch_files(patches_dir: Path) -> list[Path]:
    return sorted(patches_dir.glob("*.patch"))


def stamp_text(sdist_sha: str, patches: list[Path]) -> str:
    lines = [f"sdist {sdist_sha}"]
    lines += [f"patch {p.name} {sha256_file(p)}" for p in patches]
    return "\n".join(lines) + "\n"


def extract_vendored(sdist: Path, dest: Path) -> None:
    prefix = f"{PINS['sdist'].removesuffix('.tar.gz')}/vendor/llama.cpp/"
    with tarfile.open(sdist) as tar:
        members = []
        for member in tar.getmembers():
            if member.name.startswith(prefix) and len(member.name) > len(prefix):
                member.name = member.name[len(prefix):]
                members.append(member)
        if not members:
            raise FetchError(f"{sdist} holds no vendor/llama.cpp; is it the right sdist?")
        tar.extractall(dest, members=members, filter="data")


def apply_patch(patch: Path, tree: Path) -> None:
    base = ["patch", "-p1", "--forward", "--batch", "--no-backup-if-mismatch", "-d", str(tree), "-i", str(patch)]
    check = subprocess.run(base + ["--dry-run"], capture_output=True, text=True)
    if check.returncode != 0:
        raise FetchError(f"patch {patch.name} does not apply to llama.cpp {PINS['llama_cpp_commit']}:\n"
                         f"{check.stdout}{check.stderr}")
    subprocess.run(base + ["--quiet"], check=True)


def prepare(dest: Path, patches_dir: Path, sdist: Path | None = None) -> bool:
    """Make dest the patched tree. Returns True if work was done."""
    sdist = sdist or download_sdist(cache_dir() / "sdist")
    sdist_sha = verify_sdist(sdist)
    patches = patch_files(patches_dir)
    stamp = stamp_text(sdist_sha, patches)
    stamp_path = dest / STAMP_NAME
    if stamp_path.exists() and stamp_path.read_text() == stamp:
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Build the new tree beside the old one and swap it in only when every patch applied.
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".llama.cpp-") as tmp:
        tree = Path(tmp) / "tree"
        tree.mkdir()
        extract_vendored(sdist, tree)
        for patch in patches:
            print(f"fetch: applying {patch.name}", flush=True)
            apply_patch(patch, tree)
        (tree / STAMP_NAME).write_text(stamp)
        if dest.exists():
            shutil.rmtree(dest)
        tree.rename(dest)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dest", type=Path, default=ROOT / "third_party" / "llama.cpp")
    parser.add_argument("--patches", type=Path, default=ROOT / "patches")
    parser.add_argument("--sdist", type=Path, help="use this sdist file instead of the cached download")
    parser.add_argument("--print-sdist", action="store_true", help="print the verified sdist path and exit")
    args = parser.parse_args(argv)
    try:
        if args.print_sdist:
            sdist = args.sdist or download_sdist(cache_dir() / "sdist")
            verify_sdist(sdist)
            print(sdist)
            return 0
        changed = prepare(args.dest, args.patches, args.sdist)
    except FetchError as err:
        print(f"fetch: error: {err}", file=sys.stderr)
        return 1
    print(f"fetch: {args.dest} {'prepared' if changed else 'up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
