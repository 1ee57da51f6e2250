"""The ``tributary`` command. ``app`` assembles the command groups; each group lives in its
own module here, or, for a role's own commands, in that role's distribution
(``tributary.hub.commands``, ``tributary.spoke.commands``)."""
