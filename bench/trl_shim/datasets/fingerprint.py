"""Stand-in datasets.fingerprint (see bench/trl_shim/README.md)."""

from _missing import placeholder

Hasher = placeholder("datasets.fingerprint", "Hasher")
