"""Commands of the spoke role: the agent, the site's data and its data steward."""
