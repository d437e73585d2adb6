"""The experiment file: its typed schema, ``--set`` overrides, YAML reading and ``$KNET_HOME``."""
