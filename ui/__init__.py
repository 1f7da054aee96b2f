"""The Gradio page and API of Duet: thin handlers over chatbot.ChatService."""
