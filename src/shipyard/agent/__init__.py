"""Nodes: the agent that runs a node (agent.py, runner.py, reaper.py) and the control
plane's scheduler that places instances on nodes (scheduler.py); see docs/nodes.md."""
