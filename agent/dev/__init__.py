"""The development wing: tools for people and CI, not for the head unit: the development PKI,
the development broker, the capture simulator and the replay tool.

May import every car wing beneath it; nothing on the car imports it.
"""
