"""The SmolLM2 world: a real pretrained model (SmolLM2-135M-Instruct) and the smol:* tasks."""
