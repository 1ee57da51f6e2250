"""Commands of the hub role: its entry points and its operators' tools."""
