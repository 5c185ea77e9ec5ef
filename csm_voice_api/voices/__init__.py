"""Voice library: stored reference clips (and their Mimi codes) that requests can speak with."""

from csm_voice_api.voices.store import RecoveryReport, StoreCorrupt, Voice, VoiceStore

__all__ = ["RecoveryReport", "StoreCorrupt", "Voice", "VoiceStore"]
