"""Loss functions (ground floor: torch only, no montrage imports besides errors)."""
