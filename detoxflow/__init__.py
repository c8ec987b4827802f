"""detoxflow: make a language model less toxic with PEFT-PPO and a KL-penalised reward."""

__version__ = "0.1.0"
