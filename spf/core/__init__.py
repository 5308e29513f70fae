"""The method: projection math, gradient factors, the safety subspace and the projecting optimizer.

Pure torch — no files beyond the subspace's own safetensors, no argparse, no tracking.
"""
