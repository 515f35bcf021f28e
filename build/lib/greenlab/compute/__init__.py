"""Measuring the budget: energy meters, FLOP counting, memory."""
