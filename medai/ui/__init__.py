"""Streamlit glue: the only part of medai that imports streamlit."""
