"""medko's engine: the reusable toolkit under the curriculum, one concern per module.

Nothing in engine/ imports shared_logic, stage_layout, stages or medko.py.
"""
