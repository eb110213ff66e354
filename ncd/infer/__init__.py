"""Inference: forward passes over regions, region and image predictions, frozen features."""
