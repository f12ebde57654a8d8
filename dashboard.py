"""MedAI CXR dashboard: page config, sign-in gate, then navigation over the pages the user's role may see.

Every page in pages/ also checks the user and role itself (medai.ui.session.require_page), because
Streamlit can run a page file directly from its URL without this script.
"""

from pathlib import Path

import streamlit as st

from medai import backup
from medai.auth import can_open
from medai.ui.session import configure_page, current_user, login_view, sidebar_account

PAGES = Path(__file__).parent / "pages"
# (page key, file, title, icon); shown in this order when the role allows it and the file exists
NAVIGATION = [
    ("analyze", "analyze.py", "Analyze", ":material/radiology:"),
    ("history", "history.py", "History", ":material/history:"),
    ("models", "models.py", "Models", ":material/neurology:"),
    ("train", "train.py", "Train", ":material/model_training:"),
    ("metrics", "metrics.py", "Metrics", ":material/monitoring:"),
    ("backup", "backup.py", "Backup", ":material/backup:"),
    ("users", "users.py", "Users", ":material/group:"),
]

configure_page()
recovered = backup.recover_interrupted()  # a restore killed half way is undone before anything reads the files
if recovered:
    st.warning(f"Recovered after an interruption: {recovered}.", icon=":material/build:")
user = current_user()
if user is None:
    st.navigation([st.Page(login_view, title="Sign in", icon=":material/login:", url_path="login")],
                  position="hidden").run()
else:
    pages = [st.Page(PAGES / file, title=title, icon=icon, url_path=key, default=not i)
             for i, (key, file, title, icon) in enumerate(
                 [n for n in NAVIGATION if can_open(user.role, n[0]) and (PAGES / n[1]).is_file()])]
    navigation = st.navigation(pages, position="hidden")  # the sidebar links below replace Streamlit's list
    with st.sidebar:
        for page in pages:
            st.page_link(page)
    sidebar_account(user)
    navigation.run()
