"""The one page table: each page's key (its URL path and access name), title, icon, file in ``pages/``
and the roles that may open it. The dashboard's navigation, the pages' titles and ``auth.can_open``
(the dashboard's and the API's access rule) all derive from it."""

from __future__ import annotations

from dataclasses import dataclass

ROLES = ("admin", "researcher", "radiologist")
ADMIN, RESEARCHER, RADIOLOGIST = ROLES
EVERYONE = frozenset(ROLES)


@dataclass(frozen=True)
class Page:
    key: str
    title: str
    icon: str
    roles: frozenset[str]

    @property
    def file(self) -> str:
        return f"{self.key}.py"


# in navigation order (the first page a role may open is its start page)
PAGES = (
    Page("analyze", "Analyze", ":material/radiology:", EVERYONE),
    Page("history", "History", ":material/history:", EVERYONE),
    Page("pacs", "PACS", ":material/lan:", frozenset({ADMIN, RADIOLOGIST})),
    Page("models", "Models", ":material/neurology:", EVERYONE),
    Page("train", "Train", ":material/model_training:", frozenset({ADMIN, RESEARCHER})),
    Page("metrics", "Metrics", ":material/monitoring:", EVERYONE),
    Page("backup", "Backup", ":material/backup:", frozenset({ADMIN})),
    Page("users", "Users", ":material/group:", frozenset({ADMIN})),
)
BY_KEY = {p.key: p for p in PAGES}


def title(key: str) -> str:
    page = BY_KEY.get(key)
    return page.title if page else key


def page_access() -> dict[str, frozenset[str]]:
    """Role -> the keys of the pages it may open."""
    return {role: frozenset(p.key for p in PAGES if role in p.roles) for role in ROLES}
