"""`GET /health`: 200 when the database answers, 503 when it does not."""

from fastapi import APIRouter, Request, Response, status
from pydantic import BaseModel, Field
from sqlalchemy.exc import SQLAlchemyError

from backend.platform.db import Database, database_answers
from backend.platform.errors import RETRY_AFTER_SECONDS

router = APIRouter(tags=["operations"])


class HealthStatus(BaseModel):
    status: str = Field(description='"ok", or "unavailable" when the database does not answer.')


@router.get(
    "/health",
    response_model=HealthStatus,
    responses={503: {"model": HealthStatus, "description": "The database does not answer."}},
)
async def health(request: Request, response: Response) -> HealthStatus:
    """Liveness and readiness: checks that the database answers a query."""
    database: Database = request.app.state.database
    try:
        answers = await database.run(database_answers)
    except SQLAlchemyError:
        # No first connection could be made, or every connection stayed busy past the pool
        # timeout: either way not ready for traffic.
        answers = False
    if answers:
        return HealthStatus(status="ok")
    response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    response.headers["Retry-After"] = RETRY_AFTER_SECONDS
    return HealthStatus(status="unavailable")
