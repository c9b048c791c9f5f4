"""The RunPod queue-endpoint program: `python -m handler.runpod_queue` (see handler.py)."""
