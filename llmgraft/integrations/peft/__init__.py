"""PEFT integration (adapter tuners such as MoS, merge drivers). Filled in by the MoS and merging work."""
