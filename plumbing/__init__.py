"""The plumbing under the commands: none of it holds a method, a model or a setting to edit.

- flags: the command lines' parser (underscored flags, hyphenated aliases, ConfigError).
- safe_writes: one process per folder (flock) and files replaced atomically.
- run_folder: a run's folder, created, locked, cleared for --overwrite and given config.json.
- checkpoints: checkpoints saved atomically, loaded safely and resumed from.
- distributed: several training processes under torchrun (identity outside it).
- download: fetching the CPSC2018 archive with resume and unpacking it safely.
- pretrained: a model folder (model.safetensors, config.json) written, checked and read back, from
  a folder or the Hugging Face Hub.
"""
