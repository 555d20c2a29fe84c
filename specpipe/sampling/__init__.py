"""Sampling math: pure torch, no grpc or redis imports."""
