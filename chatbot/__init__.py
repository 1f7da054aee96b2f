"""The chat side of Duet: config, model loading, paired sampling, the store, the adapter
registry and hot-swap, and the ChatService that the UI and the API call."""
