"""MedAI CXR dashboard: page config, sign-in gate, then navigation over the pages the user's role may see.

Every page in pages/ also checks the user and role itself (medai.ui.session.require_page), because
Streamlit can run a page file directly from its URL without this script.
"""

from pathlib import Path

import streamlit as st

from medai import backup
from medai.auth import can_open
from medai.pages import PAGES as PAGE_TABLE
from medai.ui.session import configure_page, current_user, login_view, sidebar_account

PAGES = Path(__file__).parent / "pages"

configure_page()
recovered = backup.recover_interrupted()  # a restore killed half way is undone before anything reads the files
if recovered:
    st.warning(f"Recovered after an interruption: {recovered}.", icon=":material/build:")
user = current_user()
if user is None:
    st.navigation([st.Page(login_view, title="Sign in", icon=":material/login:", url_path="login")],
                  position="hidden").run()
else:
    # the page table's order, those the role may open and whose file exists
    pages = [st.Page(PAGES / p.file, title=p.title, icon=p.icon, url_path=p.key, default=not i)
             for i, p in enumerate([p for p in PAGE_TABLE if can_open(user.role, p.key) and (PAGES / p.file).is_file()])]
    navigation = st.navigation(pages, position="hidden")  # the sidebar links below replace Streamlit's list
    with st.sidebar:
        for page in pages:
            st.page_link(page)
    sidebar_account(user)
    navigation.run()
