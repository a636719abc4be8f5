"""Measurement, shared by both sides: metric names, the machine and its hardware option (peaks, prices,
cost), memory and FLOPs, energy, generation timing, and the probes that measure a CPU's peak.

Modules the launcher reads (``names``, ``machine``, ``hardware``, ``memory``, ``probes``) import no torch at
module level; the rest are the ranks'.
"""
