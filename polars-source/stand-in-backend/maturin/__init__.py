"""A stand-in for the `maturin` build backend, used only to *download* the Polars sdist.

`pip download` of an sdist asks its build backend for the package metadata; the real backend
(maturin) runs cargo, which wants a git dependency that cannot be fetched here. This stand-in
answers the metadata question from the sdist's own PKG-INFO and never builds anything.
Used with `pip download --no-build-isolation` and this directory on PYTHONPATH.
"""

import os
import shutil


def _metadata(metadata_directory):
    fields = {}
    with open("PKG-INFO", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                break
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    name = fields["Name"].replace("-", "_")
    dist_info = f"{name}-{fields['Version']}.dist-info"
    os.makedirs(os.path.join(metadata_directory, dist_info), exist_ok=True)
    shutil.copy("PKG-INFO", os.path.join(metadata_directory, dist_info, "METADATA"))
    return dist_info


def get_requires_for_build_wheel(config_settings=None):
    return []


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    return _metadata(metadata_directory)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    raise RuntimeError("polars-node's stand-in backend only downloads the source; it never builds")
