"""Examples of flatquant-modifier; ``examples.common`` holds their helpers."""
