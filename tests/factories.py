"""factory-boy factories for Better Auth users and tasks, bound to each test's session."""

import uuid
from datetime import UTC, datetime

import factory
from factory.alchemy import SQLAlchemyModelFactory
from sqlmodel import Session

from backend.features.task_model import Task
from backend.platform.users import BetterAuthUser


class UserFactory(SQLAlchemyModelFactory):
    class Meta:
        model = BetterAuthUser
        sqlalchemy_session_persistence = "flush"

    id = factory.LazyFunction(lambda: f"user-{uuid.uuid4().hex[:16]}")
    name = factory.Faker("name")
    email = factory.LazyAttribute(lambda o: f"{o.id}@example.com")
    emailVerified = False  # noqa: N815 - Better Auth's column name
    createdAt = factory.LazyFunction(lambda: datetime.now(UTC))  # noqa: N815
    updatedAt = factory.LazyFunction(lambda: datetime.now(UTC))  # noqa: N815


class TaskFactory(SQLAlchemyModelFactory):
    """TaskFactory(user_id=user.id, ...); the row is flushed, so its id and timestamps are set."""

    class Meta:
        model = Task
        sqlalchemy_session_persistence = "flush"

    user_id = factory.LazyFunction(lambda: UserFactory().id)
    title = factory.Sequence(lambda n: f"Task {n}")
    description = factory.Faker("sentence")
    completed = False


def bind_factories(session: Session) -> None:
    for factory_class in (UserFactory, TaskFactory):
        factory_class._meta.sqlalchemy_session = session  # type: ignore[attr-defined]
