"""The Hydra configs, importable as the package `sapo_ray.conf` (sapo_ray/conf links here), so an installed
wheel carries them and `hydra.main(config_path="pkg://sapo_ray.conf")` finds them from any directory.
Hydra's package config source only reads a directory that has an `__init__.py`."""
