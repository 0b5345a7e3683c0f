"""The ground floor: helpers that import nothing else of lmstack."""
