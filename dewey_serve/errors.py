"""Errors in the OpenAI API's shape: ``{"error": {"message", "type", "param", "code"}}`` with its status.

The official clients map the status to an exception class (400 BadRequestError, 401 AuthenticationError,
404 NotFoundError, 413 and other 4xx APIStatusError, 429 RateLimitError, 503 InternalServerError) and
show ``message``; ``param`` names the request field at fault, ``code`` is a stable machine-readable word.
"""

from __future__ import annotations

from starlette.responses import JSONResponse

INVALID_REQUEST = "invalid_request_error"


class ApiError(Exception):
    """An answer that is not a success: raised anywhere in a request, turned into its response once."""

    def __init__(self, status: int, message: str, *, type: str = INVALID_REQUEST, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


class InputError(ValueError):
    """A request input the model cannot take as asked (too long, empty, invalid Unicode, unknown prompt):
    raised by the model side, answered as a 400 naming ``param``."""

    def __init__(self, message: str, param: str | None, code: str = "invalid_value"):
        super().__init__(message)
        self.param, self.code = param, code

    def api_error(self) -> ApiError:
        return bad_request(str(self), self.param, self.code)
