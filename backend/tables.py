"""Every table the migrations make, in one `MetaData`: what autogenerate compares against.

The platform's migrations never import the features: `alembic.ini` names this module
(`target_metadata = backend.tables:METADATA`) for the `alembic` command line, and tests import
it. Start-up's upgrade runs the revisions and compares nothing, so it needs no models.
"""

from sqlalchemy import MetaData
from sqlmodel import SQLModel

import backend.features.task_model  # noqa: F401 - declares `tasks`
import backend.platform.idempotency  # noqa: F401 - declares `idempotency_keys`
import backend.platform.users  # noqa: F401 - declares Better Auth's `user`

METADATA: MetaData = SQLModel.metadata
