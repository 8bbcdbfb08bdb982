"""Sources of memory events other than the native recorder's own entry points."""
