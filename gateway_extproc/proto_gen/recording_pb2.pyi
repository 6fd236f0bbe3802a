from google.protobuf import any_pb2 as _any_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Recording(_message.Message):
    __slots__ = ("name", "description", "steps", "ending")
    class Ending(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        HALF_CLOSE: _ClassVar[Recording.Ending]
        CANCEL: _ClassVar[Recording.Ending]
    HALF_CLOSE: Recording.Ending
    CANCEL: Recording.Ending
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    ENDING_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    steps: _containers.RepeatedCompositeFieldContainer[Step]
    ending: Recording.Ending
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., steps: _Optional[_Iterable[_Union[Step, _Mapping]]] = ..., ending: _Optional[_Union[Recording.Ending, str]] = ...) -> None: ...

class Step(_message.Message):
    __slots__ = ("frame", "expect")
    FRAME_FIELD_NUMBER: _ClassVar[int]
    EXPECT_FIELD_NUMBER: _ClassVar[int]
    frame: _any_pb2.Any
    expect: _containers.RepeatedCompositeFieldContainer[Expectation]
    def __init__(self, frame: _Optional[_Union[_any_pb2.Any, _Mapping]] = ..., expect: _Optional[_Iterable[_Union[Expectation, _Mapping]]] = ...) -> None: ...

class Expectation(_message.Message):
    __slots__ = ("kind", "status", "error_code", "headers", "dynamic_metadata", "clear_route_cache", "body_text", "end_of_stream", "empty")
    class HeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: HeaderValue
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[HeaderValue, _Mapping]] = ...) -> None: ...
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    DYNAMIC_METADATA_FIELD_NUMBER: _ClassVar[int]
    CLEAR_ROUTE_CACHE_FIELD_NUMBER: _ClassVar[int]
    BODY_TEXT_FIELD_NUMBER: _ClassVar[int]
    END_OF_STREAM_FIELD_NUMBER: _ClassVar[int]
    EMPTY_FIELD_NUMBER: _ClassVar[int]
    kind: str
    status: int
    error_code: str
    headers: _containers.MessageMap[str, HeaderValue]
    dynamic_metadata: _struct_pb2.Struct
    clear_route_cache: bool
    body_text: str
    end_of_stream: bool
    empty: bool
    def __init__(self, kind: _Optional[str] = ..., status: _Optional[int] = ..., error_code: _Optional[str] = ..., headers: _Optional[_Mapping[str, HeaderValue]] = ..., dynamic_metadata: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., clear_route_cache: _Optional[bool] = ..., body_text: _Optional[str] = ..., end_of_stream: _Optional[bool] = ..., empty: _Optional[bool] = ...) -> None: ...

class HeaderValue(_message.Message):
    __slots__ = ("equals", "any_pod_of_model", "present")
    EQUALS_FIELD_NUMBER: _ClassVar[int]
    ANY_POD_OF_MODEL_FIELD_NUMBER: _ClassVar[int]
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    equals: str
    any_pod_of_model: str
    present: bool
    def __init__(self, equals: _Optional[str] = ..., any_pod_of_model: _Optional[str] = ..., present: _Optional[bool] = ...) -> None: ...
