"""The data-plane configuration document shared by the agent and the operator."""
