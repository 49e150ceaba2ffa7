"""Shared configuration of the tiny-VLM tests."""

from __future__ import annotations

from tokensieve.zoo.build import TinyConfig

# a smaller tiny VLM than the shipped one, for training and code-path tests
SMALL = TinyConfig(vision_hidden=32, vision_layers=3, vision_heads=2, vision_mlp=64,
                   text_hidden=32, text_layers=2, text_heads=2, text_mlp=64)
