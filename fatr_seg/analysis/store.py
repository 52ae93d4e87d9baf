"""The results store of the experiments: one JSON file, written atomically after every step
(:class:`Store`, :func:`cached`: a stopped run resumes where it stopped), and :func:`write_json`
(:func:`write_files`: with its markdown) for the one-shot results of the benchmarks, the demo and
``tools/get_flops.py``.
"""

from __future__ import annotations

import json
import os
import os.path as osp
import time

__all__ = ["Store", "cached", "log", "write_files", "write_json"]


def write_json(path: str, data, indent: int = 2) -> None:
    """Write ``data`` to ``path`` as JSON: a new file, then renamed over the old one, so a run
    stopped mid-write leaves the previous file whole."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=indent)
    os.replace(tmp, path)


def write_files(out_dir: str, stem: str, result: dict, markdown: str, indent: int = 2) -> dict:
    """``STEM.json`` and ``STEM.md`` under ``out_dir`` (the JSON written atomically)."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: osp.join(out_dir, f"{stem}.{k}") for k in ("json", "md")}
    write_json(paths["json"], result, indent=indent)
    with open(paths["md"], "w") as f:
        f.write(markdown)
    return paths


class Store:
    """``results.json`` at ``path``, written after every step; a key present is not recomputed.

    A file made with other ``settings`` (what the results depend on) is refused with a
    ``ValueError`` naming the differences, but for the ``extendable`` ones (e.g. ``seeds``: a
    run can be extended), whose new values are recorded.
    """

    def __init__(self, path: str, settings: dict, extendable: tuple[str, ...] = ()) -> None:
        self.path = path
        self.data = {"settings": settings, "runs": {}}
        if not osp.isfile(path):
            return
        with open(path) as f:
            old = json.load(f)
        old_settings = old.get("settings", {})
        ours = json.loads(json.dumps(settings))  # tuples as the file holds them: lists
        diff = sorted(k for k in set(old_settings) | set(ours) if k not in extendable
                      and old_settings.get(k) != ours.get(k))  # fmt: skip
        if diff:
            changes = ", ".join(f"{k}: {old_settings.get(k)!r} -> {ours.get(k)!r}" for k in diff)
            raise ValueError(
                f"{path} holds results made with other settings ({changes}): use the same "
                "options to resume, or another --work-dir"
            )
        old["settings"] = settings
        self.data = old

    def get(self, key):
        return self.data["runs"].get(key)

    def put(self, key, value) -> None:
        self.data["runs"][key] = value
        self.save()

    def save(self) -> None:
        write_json(self.path, self.data, indent=1)


def cached(store: Store, key: str, fn):
    """``store``'s value of ``key``, computed by ``fn()`` and stored first when it has none."""
    value = store.get(key)
    if value is None:
        t0 = time.time()
        value = fn()
        store.put(key, value)
        short = f"{value:.2f}" if isinstance(value, float) else json.dumps(value)
        short = short if len(short) < 100 else short[:97] + "..."
        log(f"{key}: {short} ({time.time() - t0:.0f} s)")
    return value


_T0 = time.time()


def log(msg: str) -> None:
    """One progress line on stdout, with the seconds since the start."""
    print(f"[study {time.time() - _T0:6.0f}s] {msg}", flush=True)
