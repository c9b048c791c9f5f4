"""The Python worker: model, engine, protocol and the RunPod handler."""
