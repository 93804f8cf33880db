"""The benchmarks (python -m bench): MaxSim speed, memory and rehearsals, search latency; the showcase."""
